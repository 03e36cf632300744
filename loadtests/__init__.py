"""splitserve's serving benchmark client (not installed; run from the repository root).

    python loadtests/bench_serve.py --base-url http://127.0.0.1:8000 --num-prompts 200 --request-rate 4
"""
