from agent.shim.main import main

main()
