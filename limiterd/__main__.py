from limiterd.cli import main

main()
