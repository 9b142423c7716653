"""Questions shared by the benchmarks and the tests, written once. The benchmarks import this
module from their own folder; tests/conftest.py puts the folder on the tests' path."""

# About functools and json: the serving benchmarks (bench_serve, bench_batching, bench_scale) ask
# them all; the deploy tests' two-module index (python-docs:functools,json) the first four.
SERVE_QUESTIONS = [
    "What does functools.lru_cache do?",
    "How do I serialize a Python object to a JSON string?",
    "What is functools.partial used for?",
    "How can json.loads parse floats as Decimal?",
    "What does functools.wraps do?",
    "How do I pretty-print JSON with indentation?",
    "What is functools.reduce?",
    "What does json.dump write to?",
    "What is functools.cached_property?",
    "How do I make json.dumps sort keys?",
    "What does functools.total_ordering do?",
    "What is json.JSONDecodeError?",
]

# Iterative retrieval (RaLMSpec): the ones both the benchmark and the pipeline tests ask, about
# the modules of the tests' small index (json, textwrap, heapq, functools, itertools, bisect).
_ITERATIVE_SHARED = [
    "How do I pretty-print JSON with indentation?", "What does textwrap.dedent remove?",
    "How do I merge several sorted inputs?", "What is a heap queue?", "How does functools.partial work?",
    "What does lru_cache do?", "How do I chain iterables together?", "How can I group consecutive items?",
    "What does bisect_left return?", "How do I insert into a sorted list?", "How do I parse a JSON string?",
]

# tests/pipeline/test_iterative_exact.py: the shared ones, then more on the same six modules.
ITERATIVE_QUESTIONS = _ITERATIVE_SHARED + [
    "What does json.dumps sort_keys do?", "How do I wrap long text to a width?", "What does reduce do?",
    "How do I get the n largest elements?", "How does itertools.product work?", "What is total_ordering?",
    "How do I shorten text with a placeholder?", "What does cycle do?", "How do I decode JSON to objects?",
    "What is singledispatch?",
]

# benchmarks/bench_ralmspec.py: the shared ones, then questions across the whole standard library.
RALMSPEC_QUESTIONS = _ITERATIVE_SHARED + [
    "How do I run a subprocess and capture its output?", "How do I wrap long text to a width?",
    "What does functools.reduce do?", "How do I get the n largest elements?",
    "How does itertools.product work?", "How do I parse command-line arguments?",
    "How do I read a CSV file?", "How do I compute a SHA-256 hash?",
    "How do I make a temporary directory?",
    "How do I match a regular expression at the start of a string?", "How do I copy a directory tree?",
    "How do I get the current date and time?", "What is a named tuple?", "How do I count hashable items?",
    "How do I create a thread pool?", "How do I serialize objects with pickle?",
    "How do I compress data with gzip?", "How do I format a date as a string?",
    "How do I walk a directory?", "How do I log messages to a file?", "What does a dataclass generate?",
    "How do I use a context manager?", "How do I open a SQLite database?",
    "How do I measure the execution time of code?", "How do I generate random numbers?",
    "How do I encode bytes in base64?", "What is an abstract base class?",
    "How do I send an HTTP request?", "How do I compare two sequences for differences?",
]
