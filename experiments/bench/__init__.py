"""The benchmark harness: the fast-path and kernel benchmark jobs and their parts.

  timing       the one timing method (`time_loop` over `chained_loop`) and the measured
               bandwidth / matmul ceilings
  synthetic    seeded synthetic q/k/v (topic-structured and Gaussian)
  fast_parity  parity of the fast path's sets (captured mass, certified eps, errors)
  fast_bench   job "fast_bench" (configs/fast_bench.py)
  kernel_bench job "kernel_bench" (configs/kernel_bench.py)
  tables       the markdown tables of both jobs
  profile      dev CLI, not a job: per-kernel device time of one step, and the table of a
               (cut-short) fast_bench results.jsonl

Jobs run through `python -m experiments.run --config=...` (experiments.cli.JOBS).
"""
