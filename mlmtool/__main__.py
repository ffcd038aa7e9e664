from mlmtool.cli import main

main()
