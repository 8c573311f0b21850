'use strict'
// A Node HTTP server that accepts fleet heartbeats, verified with the middleware before
// anything parses them. Run: FLEET_AGENT_SECRETS='{"acme-001":"s3cret"}' node examples/heartbeat-server.js
// It prints the port it listens on; POST signed heartbeats to /api/heartbeats.

const http = require('node:http')
const { fleetMiddleware } = require('..')

function createServer({ secrets, fallback, onHeartbeat }) {
  const verify = fleetMiddleware({ secrets, fallback, heartbeat: true })
  return http.createServer((req, res) => {
    if (req.method !== 'POST' || req.url !== '/api/heartbeats') {
      res.statusCode = 404
      return res.end()
    }
    verify(req, res, () => {
      onHeartbeat(req.fleet.instanceId, req.fleet.heartbeat)
      res.setHeader('content-type', 'application/json')
      res.end(JSON.stringify({ ok: true }))
    })
  })
}

module.exports = { createServer }

if (require.main === module) {
  const secrets = process.env.FLEET_AGENT_SECRETS || null
  const fallback = process.env.FLEET_AGENT_TOKEN || null
  const server = createServer({
    secrets,
    fallback,
    onHeartbeat: (id, hb) => console.log(`heartbeat from ${id}: db_ok=${hb.db_ok} redis_ok=${hb.redis_ok}`),
  })
  server.listen(Number(process.env.PORT || 0), '127.0.0.1', () => {
    console.log(`listening on http://127.0.0.1:${server.address().port}`)
  })
}
