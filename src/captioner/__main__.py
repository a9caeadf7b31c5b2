"""`python -m captioner ...` is the `captioner` command (for `torchrun` / `accelerate launch`)."""

from captioner.cli import main

main()
