#!/usr/bin/env python3
"""Users for the REGISTER benchmark: N users u1..uN with password pw<i>.

Writes OUTDIR/users.toml (the server's users file, MD5 HA1 only: hashing a password at
load time would only slow start-up) and OUTDIR/users.csv (SIPp injection file:
user;[authentication username=user password=password], the form SIPp expands).

Usage: gen_users.py N REALM OUTDIR
"""
import hashlib
import os
import sys

n, realm, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(os.path.join(out, "users.toml"), "w") as toml, \
        open(os.path.join(out, "users.csv"), "w") as csv:
    csv.write("SEQUENTIAL\n")
    for i in range(1, n + 1):
        user, password = f"u{i}", f"pw{i}"
        ha1 = hashlib.md5(f"{user}:{realm}:{password}".encode()).hexdigest()
        toml.write(f'[users.{user}]\nha1_md5 = "{ha1}"\n')
        csv.write(f"{user};[authentication username={user} password={password}];\n")
