-- The alert lists (GET /api/alerts, /alerts, an installation's page) show each alert's
-- webhook delivery: its newest outbox row, found by alert. Without this index every listed
-- alert scanned the outbox.
CREATE INDEX webhook_outbox_alert ON webhook_outbox (alert_id);
