"""``python -m posthoc_ema``: the ``posthoc-ema`` command, for when the console script is not on PATH."""

from posthoc_ema.cli import main

if __name__ == "__main__":
    main()
