-- Plugin requests can be rejected, and an instance asking again for what it already asked
-- for gets its pending request back instead of a copy.
--   rejection_reason: why an admin turned the request down (POST .../reject), or why this
--     migration closed it; NULL for pending and approved requests, and for a rejection
--     without a reason.
ALTER TABLE plugin_requests ADD COLUMN rejection_reason TEXT;

-- Copies stored before: the oldest pending request of each (instance, plugin, version,
-- action) stays pending, the later ones are closed as rejected and name it, so the unique
-- index below can be built on any existing data.
UPDATE plugin_requests
SET status = 'rejected',
    decided_at = EXTRACT(EPOCH FROM now())::BIGINT,
    rejection_reason = 'a copy of request ' || (
        SELECT MIN(k.id) FROM plugin_requests k
        WHERE k.status = 'pending' AND k.instance_id = plugin_requests.instance_id
          AND k.name = plugin_requests.name AND k.version = plugin_requests.version
          AND k.action = plugin_requests.action
    ) || ', which was already pending'
WHERE status = 'pending' AND id > (
    SELECT MIN(k.id) FROM plugin_requests k
    WHERE k.status = 'pending' AND k.instance_id = plugin_requests.instance_id
      AND k.name = plugin_requests.name AND k.version = plugin_requests.version
      AND k.action = plugin_requests.action
);

-- One pending request per instance, plugin, version and action: a second identical request
-- conflicts here and is answered with the first (INSERT ... ON CONFLICT DO NOTHING), even
-- when both arrive at once.
CREATE UNIQUE INDEX plugin_requests_one_pending
    ON plugin_requests (instance_id, name, version, action) WHERE status = 'pending';
