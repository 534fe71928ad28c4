-- A waiter gives up its place (deadline, caller gone). ARGV[4..]: ticket, the user bucket's ub ('' = none).
leave(ARGV[4], ARGV[5])
return {1}
