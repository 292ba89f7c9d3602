from rankwire.entry import main

main()
