"""The benchmark suite: ``python -m bench [--quick | --smoke]`` (see bench/README.md).

Modules, imports pointing downward: ``workload`` (the tree and the writes), ``trees`` (comparing trees),
``procs`` (starting and stopping processes, CPU and memory), ``runners`` (standby, rsync, lsyncd),
``machine`` (the machine and its limits), ``measure`` (the procedures), ``report`` (tables, goals, JSON,
chart) and ``__main__`` (the command).
"""
