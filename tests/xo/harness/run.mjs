// Runs Xen Orchestra's own VM_snapshot / VM_checkpoint (package @xen-orchestra/xapi,
// unmodified) for one VM record, with only the XAPI server's answers stubbed, and
// prints what XO did as JSON: each hook request (URL, headers, status or error), XO's
// own log lines, the XAPI calls, and the result.
//
//   node --import ./register.mjs run.mjs '{"tags": [...], "networks": {...}, ...}'
//
// Input: tags, networks (guest metrics), power_state ("Running"), method ("snapshot"
// or "checkpoint"), snapshot ("ok" | "throw"), checkpoint ("ok" | "bad_power_state"),
// syncHookSecret, syncHookTimeout (ms), settle_ms (how long to wait for the detached
// /post-sync), disks (argv lists VM.snapshot runs one after another, as XAPI's
// safe_clone_disks snapshots a VM's disks: each an atomic copy of one disk) and
// disk_gaps_ms (the time between two of them).
import { spawnSync } from 'node:child_process'
import { configure } from '@xen-orchestra/log/configure'

const input = JSON.parse(process.argv[2])
const logs = []
configure({
  level: 'debug',
  transport: log => logs.push({ level: log.level, namespace: log.namespace, message: log.message,
    error: log.data?.error?.message ?? log.data?.error?.cause?.message ?? null,
    url: log.data?.url ? String(log.data.url) : null }),
})

// What XO sends: global fetch, which _httpHook calls, wrapped to record each request.
const requests = []
const realFetch = globalThis.fetch
globalThis.fetch = async (url, options = {}) => {
  const entry = { url: String(url), headers: { ...options.headers }, status: null, error: null,
    started: Date.now() }
  requests.push(entry)
  try {
    const response = await realFetch(url, options)
    entry.status = response.status
    return response
  } catch (error) {
    entry.error = error.name + ': ' + (error.cause?.code ?? error.message)
    throw error
  } finally {
    entry.ended = Date.now()
  }
}

const { Xapi } = await import('@xen-orchestra/xapi')
const options = { url: 'https://xapi.invalid', auth: { user: 'root', password: 'unused' } }
if (input.syncHookSecret !== undefined) options.syncHookSecret = input.syncHookSecret
if (input.syncHookTimeout !== undefined) options.syncHookTimeout = input.syncHookTimeout
const xapi = new Xapi(options)          // xen-api constructed, never connected

const VM = 'OpaqueRef:vm', METRICS = 'OpaqueRef:metrics', SNAPSHOT = 'OpaqueRef:snapshot'
const records = {
  VM: { [VM]: { $ref: VM, uuid: 'vm-uuid', name_label: 'vm', power_state: input.power_state ?? 'Running',
    tags: input.tags, guest_metrics: METRICS, VBDs: [] } },
  VM_guest_metrics: { [METRICS]: { $ref: METRICS, networks: input.networks ?? {} } },
}
const calls = []
const disks = []
async function snapshotDisks () {
  for (const [index, argv] of (input.disks ?? []).entries()) {
    if (index > 0) await new Promise(resolve => setTimeout(resolve, input.disk_gaps_ms?.[index - 1] ?? 0))
    const started = Date.now()
    const copy = spawnSync(argv[0], argv.slice(1), { stdio: ['ignore', 'ignore', 'pipe'] })
    if (copy.status !== 0) throw new Error('disk copy failed: ' + argv.join(' ') + ': ' + copy.stderr)
    disks.push({ argv, started, ended: Date.now() })
  }
}
xapi.getRecord = async (type, ref) => records[type][ref]
xapi.getField = async () => []
xapi.setField = async (type, ref, field) => { calls.push(`setField ${type} ${field}`) }
xapi.callAsync = async (cancelToken, method) => {
  calls.push(method)
  if (method === 'VM.snapshot' && input.snapshot === 'throw') {
    throw Object.assign(new Error('SR_FULL'), { code: 'SR_FULL' })
  }
  if (method === 'VM.checkpoint' && input.checkpoint === 'bad_power_state') {
    throw Object.assign(new Error('VM_BAD_POWER_STATE'), { code: 'VM_BAD_POWER_STATE' })
  }
  if (method === 'VM.snapshot') await snapshotDisks()
  return SNAPSHOT
}

globalThis.synchookHookPhase = true
let result = null, error = null
try {
  result = await (input.method === 'checkpoint' ? xapi.VM_checkpoint(VM) : xapi.VM_snapshot(VM))
} catch (err) {
  error = err.message
}
// The /post-sync request is detached: let it finish.
const deadline = Date.now() + (input.settle_ms ?? 3000)
while (Date.now() < deadline && requests.some(r => r.ended === undefined)) {
  await new Promise(resolve => setTimeout(resolve, 20))
}
globalThis.synchookHookPhase = false

process.stdout.write(JSON.stringify({ result, error, requests, logs, calls, disks,
  touched_stubs: [...globalThis.synchookStubsTouched],
  stand_ins: [...globalThis.synchookStandIns].sort() }) + '\n')
process.exit(0)
