"""Pipeline parallelism: stage partitioning, point-to-point communication, schedules."""
