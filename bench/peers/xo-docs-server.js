// The server shape Xen Orchestra's sync-hook docs show: node:http (or node:https)
// plus child_process.exec, one command per path. A peer for bench/run, not a product.
//
//   node xo-docs-server.js PORT SYNC_CMD POST_CMD [CERT KEY]   (CERT and KEY: HTTPS)
'use strict'
const { exec } = require('node:child_process')
const fs = require('node:fs')

const [port, syncCmd, postCmd, cert, key] = process.argv.slice(2)
const commands = { '/sync': syncCmd, '/post-sync': postCmd }

function handler (req, res) {
  const command = commands[req.url.split('?')[0]]
  if (command === undefined) {
    res.statusCode = 404
    return res.end('not found')
  }
  exec(command, error => {
    res.statusCode = error ? 500 : 200
    res.end(error ? 'failed' : 'Ok')
  })
}

const server = cert
  ? require('node:https').createServer({ cert: fs.readFileSync(cert), key: fs.readFileSync(key) }, handler)
  : require('node:http').createServer(handler)
server.listen(Number(port), '127.0.0.1')
process.on('SIGTERM', () => process.exit(0))
