"""The cost planner (`omnifuse plan`): tokens by published rules, memory, FLOPs, latency and money."""
