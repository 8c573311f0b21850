'use strict'
// A Node HTTP server that accepts fleet heartbeats, verified with the middleware before
// anything parses them. It reads the control plane's own variables; run:
//   CONTROL_PLANE_AGENT_SECRETS='{"acme-001":"s3cret"}' node examples/heartbeat-server.js
// (or CONTROL_PLANE_AGENT_TOKEN=<shared secret>; PORT to choose the port). It prints the
// port it listens on; POST signed heartbeats to /api/heartbeats.

const http = require('node:http')
const { fleetMiddleware } = require('..')

function createServer({ secrets, fallback, onHeartbeat }) {
  const verify = fleetMiddleware({ secrets, fallback, heartbeat: true })
  return http.createServer((req, res) => {
    if (req.method !== 'POST' || req.url !== '/api/heartbeats') {
      res.statusCode = 404
      return res.end()
    }
    verify(req, res, (err) => {
      res.setHeader('content-type', 'application/json')
      if (err) {
        // Only this server's own mistakes get here (a body parser mounted first, a throwing
        // onRefused): the middleware answered the client's already. Log it; the agent retries.
        console.error(err)
        res.statusCode = 500
        return res.end(JSON.stringify({ error: { code: 'internal', message: 'internal error' } }))
      }
      onHeartbeat(req.fleet.instanceId, req.fleet.heartbeat)
      res.end(JSON.stringify({ ok: true }))
    })
  })
}

module.exports = { createServer }

if (require.main === module) {
  const server = createServer({
    secrets: process.env.CONTROL_PLANE_AGENT_SECRETS || null,
    fallback: process.env.CONTROL_PLANE_AGENT_TOKEN || null,
    onHeartbeat: (id, hb) => console.log(`heartbeat from ${id}: db_ok=${hb.db_ok} redis_ok=${hb.redis_ok}`),
  })
  server.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
    console.log(`listening on http://127.0.0.1:${server.address().port}`)
  })
}
