from locator.cli import main

main()
