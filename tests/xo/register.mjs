// node --import ./register.mjs harness/run.mjs: stand-ins for packages the registry lacks.
import { register } from 'node:module'

globalThis.synchookStubsTouched = new Set()
globalThis.synchookStandIns = new Set()        // packages replaced, for the report
globalThis.synchookHookPhase = false

// A stub that accepts anything done to it at import time (a class extended, a value
// read) and records any use while XO's hook code runs.
globalThis.synchookStub = spec => {
  globalThis.synchookStandIns.add(spec)
  const touched = what => {
    if (globalThis.synchookHookPhase) globalThis.synchookStubsTouched.add(`${spec} (${what})`)
  }
  const stub = new Proxy(function () {}, {
    get: (target, key) => {
      if (key === 'prototype') return target.prototype
      if (typeof key === 'symbol') return undefined
      touched('.' + key)
      return stub
    },
    apply: () => { touched('called'); return stub },
    construct: () => { touched('new'); return {} },
  })
  return stub
}

register('./harness/hooks.mjs', import.meta.url)
