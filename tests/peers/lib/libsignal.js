// Which official libsignal this process uses, and the few calls whose shape differs between the two.
//
//   MIB_CONTACT_LIBSIGNAL unset or "current"  @signalapp/libsignal-client 0.103.0: PQXDH only (and SPQR)
//   MIB_CONTACT_LIBSIGNAL=x3dh                libsignal-client-x3dh, an npm alias of
//                                             @signalapp/libsignal-client 0.72.1: can still start and
//                                             accept classic X3DH sessions (bundles without a Kyber prekey)
//
// The choice is made once per process, when this module is first loaded. Everything else in this
// package goes through `S` and the helpers below, so the version differences live only here:
//   - 0.103 takes the local ProtocolAddress as an extra third argument of processPreKeyBundle,
//     signalEncrypt, signalDecrypt and signalDecryptPreKey; 0.72.1 does not.
//   - 0.103's PreKeyBundle.new requires the Kyber prekey; in 0.72.1 the three Kyber arguments are
//     optional (without them the session is X3DH, message version 3).
//   - IdentityKeyStore.saveIdentity answers an IdentityChange in both (older libsignals answered a
//     boolean "replaced"); identityChange() gives whichever the loaded library has.
//   - KyberPreKeyStore.markKyberPreKeyUsed gets (id, signedPreKeyId, baseKey) in 0.103, (id) in 0.72.1;
//     the store here only needs the id.
//   - 0.72.1 takes and returns Buffers, 0.103 Uint8Arrays (Buffers are accepted): callers pass Buffers
//     and wrap results in Buffer.from().
'use strict';

const VARIANTS = {
  current: { package: '@signalapp/libsignal-client', localAddress: true, x3dh: false },
  x3dh: { package: 'libsignal-client-x3dh', localAddress: false, x3dh: true },
};
const ENV = 'MIB_CONTACT_LIBSIGNAL';

/** The variant named by the environment; throws on anything unknown. */
function chooseVariant(value = process.env[ENV]) {
  const name = value === undefined || value === '' ? 'current' : value;
  if (!Object.prototype.hasOwnProperty.call(VARIANTS, name)) {
    throw new Error(`${ENV}=${JSON.stringify(value)} is not known: use "current" (the default, ${VARIANTS.current.package}) or "x3dh" (${VARIANTS.x3dh.package}, libsignal 0.72.1)`);
  }
  return name;
}

const variant = chooseVariant();
const V = VARIANTS[variant];
const S = require(V.package);

/** What is loaded: {variant, package, version, x3dh}. `x3dh`: can build a PreKeyBundle without Kyber. */
const LIBSIGNAL = Object.freeze({
  variant,
  package: V.package,
  version: require(`${V.package}/package.json`).version,
  x3dh: V.x3dh,
});

// The local address goes in as the third argument on the current library and is left out on 0.72.1.
const withLocal = (remote, local, rest) => (V.localAddress ? [remote, local, ...rest] : [remote, ...rest]);

function processPreKeyBundle(bundle, remote, local, sessions, identities) {
  return S.processPreKeyBundle(bundle, ...withLocal(remote, local, [sessions, identities]));
}

function signalEncrypt(plaintext, remote, local, sessions, identities) {
  return S.signalEncrypt(Buffer.from(plaintext), ...withLocal(remote, local, [sessions, identities]));
}

function signalDecrypt(message, remote, local, sessions, identities) {
  return S.signalDecrypt(message, ...withLocal(remote, local, [sessions, identities]));
}

function signalDecryptPreKey(message, remote, local, sessions, identities, preKeys, signedPreKeys, kyberPreKeys) {
  return S.signalDecryptPreKey(message, ...withLocal(remote, local, [sessions, identities, preKeys, signedPreKeys, kyberPreKeys]));
}

/** saveIdentity's answer: whether a different key was replaced. */
function identityChange(replaced) {
  if (!S.IdentityChange) return replaced;
  return replaced ? S.IdentityChange.ReplacedExisting : S.IdentityChange.NewOrUnchanged;
}

/**
 * A PreKeyBundle from a decoded interop `Bundle` (docs/interop-protocol.md §key directory). Without a
 * `kyber_prekey` it is an X3DH bundle, which only 0.72.1 can use.
 */
function preKeyBundleFrom(b) {
  const ec = (bytes) => S.PublicKey.deserialize(Buffer.from(bytes));
  const args = [
    b.registration_id,
    b.device_id || 1,
    b.one_time_prekey ? b.one_time_prekey.id : null,
    b.one_time_prekey ? ec(b.one_time_prekey.public_key) : null,
    b.signed_prekey.id,
    ec(b.signed_prekey.public_key),
    Buffer.from(b.signed_prekey.signature),
    ec(b.identity_key),
  ];
  if (b.kyber_prekey) {
    args.push(b.kyber_prekey.id, S.KEMPublicKey.deserialize(Buffer.from(b.kyber_prekey.public_key)), Buffer.from(b.kyber_prekey.signature));
  } else if (!LIBSIGNAL.x3dh) {
    throw new Error(
      `${b.account || 'the peer'} published no Kyber prekey (an X3DH-era client); ${LIBSIGNAL.package} ${LIBSIGNAL.version} starts PQXDH sessions only ` +
        `(a contact run with ${ENV}=x3dh can start an X3DH session)`,
    );
  }
  return S.PreKeyBundle.new(...args);
}

module.exports = {
  S,
  LIBSIGNAL,
  ENV,
  VARIANTS,
  chooseVariant,
  processPreKeyBundle,
  signalEncrypt,
  signalDecrypt,
  signalDecryptPreKey,
  identityChange,
  preKeyBundleFrom,
};
