from marketdata_pipeline.cli import main

main()
