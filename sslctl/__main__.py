"""`python -m sslctl ...` (this is what torchrun runs: `torchrun ... -m sslctl pretrain ...`)."""

from sslctl.cli import main

main()
