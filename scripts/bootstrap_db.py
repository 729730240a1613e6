"""Bootstrap the warehouse (same as `marketdata bootstrap`): for deploy scripts without the CLI."""

from marketdata_pipeline.cli import main

if __name__ == "__main__":
    main(["bootstrap"])
