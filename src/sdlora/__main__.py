from sdlora.cli import main

main()
