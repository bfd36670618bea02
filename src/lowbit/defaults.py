"""Default settings, each stated once: records, functions, the command line and the benchmarks
all take their defaults from here.

Plain values, importing nothing, so the command line shows them in ``--help`` without loading
torch.
"""

SCHEME = "W4A16"
"""Scheme of ``lowbit quantize`` and of a ``Recipe`` without one (int4 weights in groups of 128)."""
METHOD = "rtn"
"""Method of ``lowbit quantize`` and of a ``Recipe`` without one."""

CALIBRATION_SOURCE = "wiki"
"""Calibration text: the Wikipedia excerpt bundled with gensim (see ``lowbit.data.text``)."""
CALIBRATION_SAMPLES = 128
"""Calibration windows, as in GPTQ (Frantar et al., 2022)."""
CALIBRATION_SEQ_LEN = 512
"""Tokens per calibration window."""
CALIBRATION_SEED = 0
"""Seed of the random window offsets."""
BATCH_SIZE = 8
"""Calibration windows per forward pass in the layer-by-layer pipeline (memory vs speed; the
result does not depend on it)."""

EVAL_SOURCE = "wiki"
"""Evaluation text: the evaluation split of the same source (documents disjoint from calibration)."""
EVAL_TOKENS = 4096
"""Evaluation tokens: 8 windows of 512, of which 4,088 are scored."""
EVAL_WINDOW = 512
"""Tokens per evaluation window (disjoint windows unless a smaller stride is given)."""

BUDGET = "2%"
"""Largest relative task-accuracy loss ``lowbit validate`` accepts (the field's common 2%)."""
BUDGET_CONFIDENCE = 0.95
"""One-sided confidence with which a loss must exceed the budget before ``lowbit validate`` fails."""
VALIDATE_TASKS = "mmlu,hellaswag,arc_easy,lambada"
"""Tasks ``lowbit validate`` scores when none are named."""
TASK_SEED = 1234
"""Seed of the ``--limit`` subset of task items and of the few-shot examples."""

CHAT_MAX_NEW_TOKENS = 64
"""Greedy tokens per answer in ``lowbit chat``."""
CHAT_CODE_TIMEOUT = 5.0
"""Seconds a coding answer (and its asserts) may run in ``lowbit chat``'s sandbox."""

BENCH_PROMPT_TOKENS = 128
"""Prompt tokens per sequence in ``lowbit bench`` (prefill and time to first token)."""
BENCH_DECODE_TOKENS = 32
"""Greedy tokens generated per sequence in ``lowbit bench`` (decode speed)."""
BENCH_BATCH_SIZES = (1, 8)
"""Batch sizes ``lowbit bench`` measures."""
BENCH_REPEATS = 3
"""Timed runs per measurement in ``lowbit bench`` (the median is kept, after one warm-up)."""
