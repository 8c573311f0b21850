-- Message ids are pruned by age only, and they arrive in the order of their seen_at: a
-- block-range index answers the pruning's range as well, and costs an insert next to nothing
-- instead of a B-tree entry per heartbeat.
DROP INDEX IF EXISTS seen_messages_seen_at;
CREATE INDEX seen_messages_seen_at ON seen_messages USING brin (seen_at);
