from rankwire.cli import main

main()
