"""`make bench`: crm-pulse's performance figures on each embedded broker, Tansu and Apache Kafka (see bench/run.py).

The worker is measured strictly from outside: `crm-pulse worker` processes configured by `CRM_PULSE_*`
variables, their `/metrics`, their `/proc/<pid>/status` and their Kafka topics.
"""
