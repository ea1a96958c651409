// Module hooks for run.mjs: a package that @xen-orchestra/xapi imports but that the
// package registry does not have (disk and backup code: vhd-lib's newer files,
// @vates/task, @vates/parse-duration, ...) resolves to a stand-in module. Each
// stand-in exports the names its importer asks for, every one a stub that records
// being touched (see run.mjs): the hook path never touches one, and the tests check.
import { readFile } from 'node:fs/promises'

const PREFIX = 'synchook-stub:'
const IMPORT = /import\s+([\w$\s{},*]+?)\s+from\s+['"]([^'"]+)['"]/g

export async function resolve(specifier, context, next) {
  try {
    return await next(specifier, context)
  } catch (error) {
    // Only a package imported by a package: never a file of ours, never a typo here.
    const bare = !/^(\.|\/|node:|file:)/.test(specifier)
    const fromPackage = (context.parentURL ?? '').includes('/node_modules/')
    if (error.code !== 'ERR_MODULE_NOT_FOUND' || !bare || !fromPackage) {
      throw error
    }
    const query = new URLSearchParams({ spec: specifier, from: context.parentURL ?? '' })
    return { url: PREFIX + query, shortCircuit: true }
  }
}

export async function load(url, context, next) {
  if (!url.startsWith(PREFIX)) {
    return next(url, context)
  }
  const query = new URLSearchParams(url.slice(PREFIX.length))
  const spec = query.get('spec')
  const names = new Set()
  const from = query.get('from')
  if (from.startsWith('file:')) {
    const source = await readFile(new URL(from), 'utf8')
    for (const [, clause, target] of source.matchAll(IMPORT)) {
      if (target !== spec) continue
      const braces = clause.match(/\{([^}]*)\}/)
      if (braces) {
        for (const part of braces[1].split(',')) {
          const name = part.trim().split(/\s+as\s+/)[0]
          if (name) names.add(name)
        }
      }
    }
  }
  names.delete('default')
  const lines = [`const stub = globalThis.synchookStub(${JSON.stringify(spec)})`, 'export default stub']
  for (const name of names) lines.push(`export const ${name} = stub`)
  return { format: 'module', source: lines.join('\n'), shortCircuit: true }
}
