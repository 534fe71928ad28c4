-- A waiter gives up its place (deadline, caller gone). ARGV[4..]: ticket, user ('' = none).
leave(ARGV[4], ARGV[5])
return {1}
