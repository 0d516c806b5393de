from fedalloc.cli import main

main()
