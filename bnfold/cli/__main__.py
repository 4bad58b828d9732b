from bnfold.cli.main import main

main()
