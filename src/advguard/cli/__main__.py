from advguard.cli import main

main()
