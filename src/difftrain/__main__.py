"""`python -m difftrain ...` (also what `accelerate launch -m difftrain ...` runs)."""

from difftrain.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
