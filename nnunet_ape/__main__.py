import sys

from nnunet_ape.cli import main

if __name__ == "__main__":
    sys.exit(main())
