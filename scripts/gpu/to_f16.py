# Converts a safetensors file's F32 tensors to F16 (to carry MiniLM under the device tool's size cap).
import json, struct, sys, array
src, dst = sys.argv[1], sys.argv[2]
b = open(src, 'rb').read()
n = struct.unpack('<Q', b[:8])[0]
hdr = json.loads(b[8:8+n]); data = b[8+n:]
out_hdr, chunks, off = {}, [], 0
for k, v in hdr.items():
    if k == '__metadata__': out_hdr[k] = v; continue
    s, e = v['data_offsets']; raw = data[s:e]
    if v['dtype'] == 'F32':
        a = array.array('f'); a.frombytes(raw)
        raw = struct.pack('<%de' % len(a), *a); dt = 'F16'
    else: dt = v['dtype']
    out_hdr[k] = {'dtype': dt, 'shape': v['shape'], 'data_offsets': [off, off + len(raw)]}
    chunks.append(raw); off += len(raw)
h = json.dumps(out_hdr).encode(); h += b' ' * ((8 - len(h) % 8) % 8)
open(dst, 'wb').write(struct.pack('<Q', len(h)) + h + b''.join(chunks))
