"""crm-pulse: CRM events in, KPIs and stalled-lead alerts out."""
