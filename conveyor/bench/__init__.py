"""`conveyor bench`: a load generator and benchmark in the manner of `vllm bench serve`.

One module per idea: `datasets` makes the prompts, `arrivals` decides when they are sent,
`runner` sends them through the SDK and times every token, `report` turns the timings (and the
controller's counters) into figures, `plots` draws them and `sweep` repeats all of it over
policies, request rates and stage counts on deployments it starts itself. Nothing here is
imported by the serving processes; matplotlib and the tokenizer are imported only when used.
"""
