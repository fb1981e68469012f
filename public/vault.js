// UVM Compute: the volunteer's encrypted store (IndexedDB + WebCrypto AES-GCM).
//
// Leased tasks, job code and results not yet acknowledged survive a refresh here. Every value
// is AES-GCM ciphertext under a non-extractable key that never leaves this browser (IndexedDB
// stores the CryptoKey object itself, not its bytes); the store name and the record key are the
// associated data, so a record copied to another slot does not decrypt.
// The page's Python (webapp/volunteer/main.py) calls it with strings only.

const DB_NAME = "uvm-volunteer";
const STORES = ["meta", "tasks", "code", "results"];

function request(req) {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

function openDB() {
  const req = indexedDB.open(DB_NAME, 1);
  req.onupgradeneeded = () => {
    for (const name of STORES) {
      if (!req.result.objectStoreNames.contains(name)) req.result.createObjectStore(name);
    }
  };
  return request(req);
}

class Vault {
  constructor(db, key) {
    this.persistent = true;
    this.reason = "";
    this.db = db;
    this.key = key;
    this.encoder = new TextEncoder();
    this.decoder = new TextDecoder();
  }

  store(name, mode) {
    return this.db.transaction(name, mode).objectStore(name);
  }

  aad(store, key) {
    return this.encoder.encode(`${store}:${key}`);
  }

  async put(store, key, text) {
    const iv = crypto.getRandomValues(new Uint8Array(12));
    const data = await crypto.subtle.encrypt(
      { name: "AES-GCM", iv, additionalData: this.aad(store, key) },
      this.key,
      this.encoder.encode(text),
    );
    await request(this.store(store, "readwrite").put({ iv, data }, String(key)));
  }

  async decrypt(store, key, record) {
    try {
      const plain = await crypto.subtle.decrypt(
        { name: "AES-GCM", iv: record.iv, additionalData: this.aad(store, key) },
        this.key,
        record.data,
      );
      return this.decoder.decode(plain);
    } catch (err) {
      return null; // tampered with, or written under a key that is gone: treat as absent
    }
  }

  async get(store, key) {
    const record = await request(this.store(store, "readonly").get(String(key)));
    return record ? this.decrypt(store, String(key), record) : null;
  }

  // Every record of a store as a JSON string [[key, text], ...]; undecryptable ones are dropped.
  async all(store) {
    const tx = this.store(store, "readonly");
    const [keys, records] = await Promise.all([request(tx.getAllKeys()), request(tx.getAll())]);
    const texts = await Promise.all(records.map((r, i) => this.decrypt(store, keys[i], r)));
    return JSON.stringify(keys.map((k, i) => [k, texts[i]]).filter(([, t]) => t !== null));
  }

  // Delete keys given as a JSON list of strings.
  async remove(store, keysJSON) {
    const keys = JSON.parse(keysJSON);
    if (!keys.length) return;
    const tx = this.db.transaction(store, "readwrite");
    for (const key of keys) tx.objectStore(store).delete(String(key));
    await new Promise((resolve, reject) => {
      tx.oncomplete = resolve;
      tx.onerror = () => reject(tx.error);
    });
  }
}

// Where IndexedDB or WebCrypto is missing (a private window in some browsers; WebCrypto needs
// https or localhost), work is kept in memory only: it still runs, but does not survive a reload.
class MemoryVault {
  constructor(reason) {
    this.persistent = false;
    this.reason = reason;
    this.stores = Object.fromEntries(STORES.map((name) => [name, new Map()]));
  }

  async put(store, key, text) {
    this.stores[store].set(String(key), text);
  }

  async get(store, key) {
    return this.stores[store].get(String(key)) ?? null;
  }

  async all(store) {
    return JSON.stringify([...this.stores[store].entries()]);
  }

  async remove(store, keysJSON) {
    for (const key of JSON.parse(keysJSON)) this.stores[store].delete(String(key));
  }
}

export async function openVault() {
  if (!globalThis.indexedDB) return new MemoryVault("this browser offers no IndexedDB");
  if (!globalThis.crypto?.subtle) return new MemoryVault("WebCrypto needs https (or localhost)");
  try {
    return await openEncryptedVault();
  } catch (err) {
    return new MemoryVault(`the browser refused storage (${err?.name || err})`);
  }
}

async function openEncryptedVault() {
  const db = await openDB();
  let key = await request(db.transaction("meta", "readonly").objectStore("meta").get("key"));
  if (!key) {
    key = await crypto.subtle.generateKey({ name: "AES-GCM", length: 256 }, false, [
      "encrypt",
      "decrypt",
    ]);
    await request(db.transaction("meta", "readwrite").objectStore("meta").put(key, "key"));
  }
  return new Vault(db, key);
}
