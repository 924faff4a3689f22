import sys

from bench.main import main

if __name__ == "__main__":  # the hand-off waiter is a spawned process, which re-imports this module
    sys.exit(main())
