"""`autoknow bench`: scaling of the rebuild with catalogue size and workers, the model stages
against the simple way (a plain `transformers` loop), and against the hardware's FLOP rate.

    run.py       the matrix and the summary (`main(args)` for the CLI, `run_bench(...)` for code)
    probe.py     per-operator timings and actor memory, watched from outside the stages
    simple.py    the simple way: the same tagger weights in a transformers pipeline
    compare.py   simple way vs our model path (and its variants), same titles, in-process
    flops.py     FLOPs of an encoder over texts; padding overheads
    machine.py   machine facts, measured matmul rates, Ray Data DataContext
    report.py    bench.json, bench.md, plots
"""
