"""Finance on top of the ledger: budget status, reports, statements, reconciliation, alerts."""
