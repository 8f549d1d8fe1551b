"""Peers: the same job as crm-pulse's lead path written with other stream processors, run by the bench's
`peer` phase beside the project's pipeline."""
