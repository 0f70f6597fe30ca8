"""Command-line tools shipped with srft_mcore."""
