"""waveclip_cli: the `waveclip` command line. All argument parsing lives here, one module per command."""
