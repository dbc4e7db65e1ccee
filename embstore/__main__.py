from embstore.cli import main

main()
