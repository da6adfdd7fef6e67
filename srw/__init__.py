"""srw's front: the `srw` command (cli.py), `srw serve` (serve.py) and its control socket."""
