"""Every Redis key and channel in one place. All of it can be rebuilt from the database."""

PREFIX = "uvm:"
READY = PREFIX + "ready:"  # + researcher id: zset "job:task:idx:timeout" scored by (-priority << 40) + task id
ACTIVE = PREFIX + "active"  # zset: researchers with ready tasks, scored by their pass (fair share)
OWNERS = PREFIX + "owners"  # hash: job id -> researcher id (which ready zset its tasks go to)
SHARES = PREFIX + "shares"  # hash: researcher id -> weight in fair share (absent: DEFAULT_SHARE)
LEASES = PREFIX + "leases"  # hash: attempt -> "score|member|volunteer|instance"
LEASED_TASKS = PREFIX + "leased_tasks"  # hash: task id -> attempt (one live lease per task)
DEADLINES = PREFIX + "deadlines"  # zset: attempt scored by its deadline (unix seconds)
LIMITS = PREFIX + "lease_limits"  # hash: attempt -> latest deadline heartbeats may reach (unix seconds)
CANCELLED = PREFIX + "cancelled"  # set: cancelled job ids (ready members of these are skipped)
RUNNING = PREFIX + "running"  # hash: job id -> live leases
COMPUTING = PREFIX + "computing:"  # + job id: hash: connection key -> "expires|tasks computed now|volunteer"
EXCLUDED = PREFIX + "excluded:"  # + task id: set of volunteer ids and network tags never to lease it to
EXCLUDED_TTL = 7 * 24 * 3600  # seconds: a forgotten set goes away on its own
EPOCH = PREFIX + "epoch"  # present once the ready queue was rebuilt from the database
REBUILD_LOCK = PREFIX + "rebuild_lock"
EVENTS = PREFIX + "events"  # pub/sub channel between server instances
