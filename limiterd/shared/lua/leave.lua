-- A waiter gives up its place (deadline, caller gone, re-attach grace over), unless a call
-- that re-attached by its request_id took the place over.
-- ARGV[4..]: ticket, the user bucket's ub ('' = none), the owner (the call's id), request_id.
leave_owned(ARGV[4], ARGV[5], ARGV[6], ARGV[7])
return {1}
