"""`python -m tagger ...`: the same CLI as the `tagger` console script."""
from tagger.cli import cli

cli()
