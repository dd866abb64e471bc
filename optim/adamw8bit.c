/* optim/adamw8bit.c — AdamW with bitsandbytes' blockwise 8-bit states (see adamw8bit.h). */
#include "optim/adamw8bit.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* bitsandbytes.functional.create_dynamic_map(signed=True / False) of bitsandbytes 0.50.2 (max_exponent_bits 7,
 * total_bits 8: for each exponent i in 0..6 the midpoints of torch.linspace(0.1, 1, k) times 10^(i-6),
 * mirrored when signed, then 0 and 1, sorted), as the values bnb computes (hexadecimal floats, exact).
 * They are the format's definition, as NF4's 16 levels are: torch.linspace's result depends on the
 * machine's vector width in the last bit, so the values are not recomputed here;
 * tests/test_adamw8bit.c checks them against bnb's (tests/fixtures/adamw8bit_ref.qref.gz). */
static const float DYNAMIC_MAP_SIGNED[256] = {
    -0x1.fc66660000000p-1f, -0x1.f533340000000p-1f, -0x1.ee00000000000p-1f, -0x1.e6cccc0000000p-1f,
    -0x1.df999a0000000p-1f, -0x1.d866660000000p-1f, -0x1.d133340000000p-1f, -0x1.ca00000000000p-1f,
    -0x1.c2cccc0000000p-1f, -0x1.bb999a0000000p-1f, -0x1.b466660000000p-1f, -0x1.ad33340000000p-1f,
    -0x1.a600000000000p-1f, -0x1.9ecccc0000000p-1f, -0x1.97999a0000000p-1f, -0x1.9066660000000p-1f,
    -0x1.8933340000000p-1f, -0x1.8200000000000p-1f, -0x1.7acccc0000000p-1f, -0x1.73999a0000000p-1f,
    -0x1.6c66680000000p-1f, -0x1.6533340000000p-1f, -0x1.5e00000000000p-1f, -0x1.56cccc0000000p-1f,
    -0x1.4f999a0000000p-1f, -0x1.4866680000000p-1f, -0x1.4133340000000p-1f, -0x1.3a00000000000p-1f,
    -0x1.32cccc0000000p-1f, -0x1.2b999a0000000p-1f, -0x1.2466680000000p-1f, -0x1.1d33340000000p-1f,
    -0x1.1600000000000p-1f, -0x1.0ecccc0000000p-1f, -0x1.0799980000000p-1f, -0x1.0066660000000p-1f,
    -0x1.f266640000000p-2f, -0x1.e400000000000p-2f, -0x1.d599980000000p-2f, -0x1.c733340000000p-2f,
    -0x1.b8cccc0000000p-2f, -0x1.aa66660000000p-2f, -0x1.9c00000000000p-2f, -0x1.8d99980000000p-2f,
    -0x1.7f33340000000p-2f, -0x1.70cccc0000000p-2f, -0x1.6266660000000p-2f, -0x1.5400000000000p-2f,
    -0x1.4599980000000p-2f, -0x1.3733340000000p-2f, -0x1.28cccc0000000p-2f, -0x1.1a66680000000p-2f,
    -0x1.0c00000000000p-2f, -0x1.fb33320000000p-3f, -0x1.de66660000000p-3f, -0x1.c1999a0000000p-3f,
    -0x1.a4cccc0000000p-3f, -0x1.8800000000000p-3f, -0x1.6b33340000000p-3f, -0x1.4e66660000000p-3f,
    -0x1.31999a0000000p-3f, -0x1.14cccc0000000p-3f, -0x1.f000000000000p-4f, -0x1.b666680000000p-4f,
    -0x1.93d70a0000000p-4f, -0x1.8851ee0000000p-4f, -0x1.7cccce0000000p-4f, -0x1.7147ae0000000p-4f,
    -0x1.65c2900000000p-4f, -0x1.5a3d700000000p-4f, -0x1.4eb8540000000p-4f, -0x1.4333340000000p-4f,
    -0x1.37ae140000000p-4f, -0x1.2c28f60000000p-4f, -0x1.20a3d60000000p-4f, -0x1.151eba0000000p-4f,
    -0x1.09999a0000000p-4f, -0x1.fc28f60000000p-5f, -0x1.e51eba0000000p-5f, -0x1.ce147a0000000p-5f,
    -0x1.b70a3e0000000p-5f, -0x1.a000000000000p-5f, -0x1.88f5c20000000p-5f, -0x1.71eb860000000p-5f,
    -0x1.5ae1460000000p-5f, -0x1.43d70a0000000p-5f, -0x1.2cccce0000000p-5f, -0x1.15c2900000000p-5f,
    -0x1.fd70a40000000p-6f, -0x1.cf5c2a0000000p-6f, -0x1.a147ae0000000p-6f, -0x1.7333340000000p-6f,
    -0x1.451eba0000000p-6f, -0x1.170a3e0000000p-6f, -0x1.d1eb860000000p-7f, -0x1.75c2900000000p-7f,
    -0x1.3e76c80000000p-7f, -0x1.2c08300000000p-7f, -0x1.19999a0000000p-7f, -0x1.072b020000000p-7f,
    -0x1.e978d40000000p-8f, -0x1.c49ba60000000p-8f, -0x1.9fbe760000000p-8f, -0x1.7ae1480000000p-8f,
    -0x1.56041a0000000p-8f, -0x1.3126e80000000p-8f, -0x1.0c49ba0000000p-8f, -0x1.ced9140000000p-9f,
    -0x1.851eb80000000p-9f, -0x1.3b645a0000000p-9f, -0x1.e353f80000000p-10f, -0x1.4fdf3a0000000p-10f,
    -0x1.eecbfe0000000p-11f, -0x1.b3d07c0000000p-11f, -0x1.78d5000000000p-11f, -0x1.3dd9820000000p-11f,
    -0x1.02de020000000p-11f, -0x1.8fc5060000000p-12f, -0x1.19ce0a0000000p-12f, -0x1.47ae160000000p-13f,
    -0x1.743e960000000p-14f, -0x1.15df660000000p-14f, -0x1.6f00680000000p-15f, -0x1.64840c0000000p-16f,
    -0x1.040bfe0000000p-17f, -0x1.b435280000000p-19f, -0x1.27476e0000000p-21f, 0x0.0p+0f,
    0x1.27476e0000000p-21f, 0x1.b435280000000p-19f, 0x1.040bfe0000000p-17f, 0x1.64840c0000000p-16f,
    0x1.6f00680000000p-15f, 0x1.15df660000000p-14f, 0x1.743e960000000p-14f, 0x1.47ae160000000p-13f,
    0x1.19ce0a0000000p-12f, 0x1.8fc5060000000p-12f, 0x1.02de020000000p-11f, 0x1.3dd9820000000p-11f,
    0x1.78d5000000000p-11f, 0x1.b3d07c0000000p-11f, 0x1.eecbfe0000000p-11f, 0x1.4fdf3a0000000p-10f,
    0x1.e353f80000000p-10f, 0x1.3b645a0000000p-9f, 0x1.851eb80000000p-9f, 0x1.ced9140000000p-9f,
    0x1.0c49ba0000000p-8f, 0x1.3126e80000000p-8f, 0x1.56041a0000000p-8f, 0x1.7ae1480000000p-8f,
    0x1.9fbe760000000p-8f, 0x1.c49ba60000000p-8f, 0x1.e978d40000000p-8f, 0x1.072b020000000p-7f,
    0x1.19999a0000000p-7f, 0x1.2c08300000000p-7f, 0x1.3e76c80000000p-7f, 0x1.75c2900000000p-7f,
    0x1.d1eb860000000p-7f, 0x1.170a3e0000000p-6f, 0x1.451eba0000000p-6f, 0x1.7333340000000p-6f,
    0x1.a147ae0000000p-6f, 0x1.cf5c2a0000000p-6f, 0x1.fd70a40000000p-6f, 0x1.15c2900000000p-5f,
    0x1.2cccce0000000p-5f, 0x1.43d70a0000000p-5f, 0x1.5ae1460000000p-5f, 0x1.71eb860000000p-5f,
    0x1.88f5c20000000p-5f, 0x1.a000000000000p-5f, 0x1.b70a3e0000000p-5f, 0x1.ce147a0000000p-5f,
    0x1.e51eba0000000p-5f, 0x1.fc28f60000000p-5f, 0x1.09999a0000000p-4f, 0x1.151eba0000000p-4f,
    0x1.20a3d60000000p-4f, 0x1.2c28f60000000p-4f, 0x1.37ae140000000p-4f, 0x1.4333340000000p-4f,
    0x1.4eb8540000000p-4f, 0x1.5a3d700000000p-4f, 0x1.65c2900000000p-4f, 0x1.7147ae0000000p-4f,
    0x1.7cccce0000000p-4f, 0x1.8851ee0000000p-4f, 0x1.93d70a0000000p-4f, 0x1.b666680000000p-4f,
    0x1.f000000000000p-4f, 0x1.14cccc0000000p-3f, 0x1.31999a0000000p-3f, 0x1.4e66660000000p-3f,
    0x1.6b33340000000p-3f, 0x1.8800000000000p-3f, 0x1.a4cccc0000000p-3f, 0x1.c1999a0000000p-3f,
    0x1.de66660000000p-3f, 0x1.fb33320000000p-3f, 0x1.0c00000000000p-2f, 0x1.1a66680000000p-2f,
    0x1.28cccc0000000p-2f, 0x1.3733340000000p-2f, 0x1.4599980000000p-2f, 0x1.5400000000000p-2f,
    0x1.6266660000000p-2f, 0x1.70cccc0000000p-2f, 0x1.7f33340000000p-2f, 0x1.8d99980000000p-2f,
    0x1.9c00000000000p-2f, 0x1.aa66660000000p-2f, 0x1.b8cccc0000000p-2f, 0x1.c733340000000p-2f,
    0x1.d599980000000p-2f, 0x1.e400000000000p-2f, 0x1.f266640000000p-2f, 0x1.0066660000000p-1f,
    0x1.0799980000000p-1f, 0x1.0ecccc0000000p-1f, 0x1.1600000000000p-1f, 0x1.1d33340000000p-1f,
    0x1.2466680000000p-1f, 0x1.2b999a0000000p-1f, 0x1.32cccc0000000p-1f, 0x1.3a00000000000p-1f,
    0x1.4133340000000p-1f, 0x1.4866680000000p-1f, 0x1.4f999a0000000p-1f, 0x1.56cccc0000000p-1f,
    0x1.5e00000000000p-1f, 0x1.6533340000000p-1f, 0x1.6c66680000000p-1f, 0x1.73999a0000000p-1f,
    0x1.7acccc0000000p-1f, 0x1.8200000000000p-1f, 0x1.8933340000000p-1f, 0x1.9066660000000p-1f,
    0x1.97999a0000000p-1f, 0x1.9ecccc0000000p-1f, 0x1.a600000000000p-1f, 0x1.ad33340000000p-1f,
    0x1.b466660000000p-1f, 0x1.bb999a0000000p-1f, 0x1.c2cccc0000000p-1f, 0x1.ca00000000000p-1f,
    0x1.d133340000000p-1f, 0x1.d866660000000p-1f, 0x1.df999a0000000p-1f, 0x1.e6cccc0000000p-1f,
    0x1.ee00000000000p-1f, 0x1.f533340000000p-1f, 0x1.fc66660000000p-1f, 0x1p+0f,
};
static const float DYNAMIC_MAP_UNSIGNED[256] = {
    0x0.0p+0f, 0x1.5cf7540000000p-22f, 0x1.a013300000000p-21f, 0x1.1d36700000000p-19f,
    0x1.2599ec0000000p-18f, 0x1.bc98a20000000p-18f, 0x1.29cbaa0000000p-17f, 0x1.0624dc0000000p-16f,
    0x1.c2e3400000000p-16f, 0x1.3fd0d00000000p-15f, 0x1.9e30000000000p-15f, 0x1.fc8f340000000p-15f,
    0x1.2d77320000000p-14f, 0x1.5ca6c80000000p-14f, 0x1.8bd6620000000p-14f, 0x1.0cb2960000000p-13f,
    0x1.82a9940000000p-13f, 0x1.f8a0920000000p-13f, 0x1.374bc80000000p-12f, 0x1.7247440000000p-12f,
    0x1.ad42c60000000p-12f, 0x1.e83e440000000p-12f, 0x1.119ce20000000p-11f, 0x1.2f1aa00000000p-11f,
    0x1.4c98600000000p-11f, 0x1.6a16200000000p-11f, 0x1.8793de0000000p-11f, 0x1.a511a00000000p-11f,
    0x1.c28f5e0000000p-11f, 0x1.e00d1c0000000p-11f, 0x1.fd8adc0000000p-11f, 0x1.2b020c0000000p-10f,
    0x1.74bc6a0000000p-10f, 0x1.be76c80000000p-10f, 0x1.0418940000000p-9f, 0x1.28f5c20000000p-9f,
    0x1.4dd2f00000000p-9f, 0x1.72b0200000000p-9f, 0x1.978d4e0000000p-9f, 0x1.bc6a800000000p-9f,
    0x1.e147ae0000000p-9f, 0x1.03126e0000000p-8f, 0x1.1581040000000p-8f, 0x1.27ef9e0000000p-8f,
    0x1.3a5e340000000p-8f, 0x1.4ccccc0000000p-8f, 0x1.5f3b640000000p-8f, 0x1.71a9fa0000000p-8f,
    0x1.8418940000000p-8f, 0x1.96872a0000000p-8f, 0x1.a8f5c20000000p-8f, 0x1.bb645c0000000p-8f,
    0x1.cdd2f00000000p-8f, 0x1.e0418a0000000p-8f, 0x1.f2b01e0000000p-8f, 0x1.028f5c0000000p-7f,
    0x1.0bc6a80000000p-7f, 0x1.14fdf20000000p-7f, 0x1.1e35400000000p-7f, 0x1.276c8a0000000p-7f,
    0x1.30a3d60000000p-7f, 0x1.39db240000000p-7f, 0x1.43126e0000000p-7f, 0x1.5eb8540000000p-7f,
    0x1.8cccce0000000p-7f, 0x1.bae1460000000p-7f, 0x1.e8f5c40000000p-7f, 0x1.0b851e0000000p-6f,
    0x1.228f5e0000000p-6f, 0x1.39999a0000000p-6f, 0x1.50a3d60000000p-6f, 0x1.67ae160000000p-6f,
    0x1.7eb8520000000p-6f, 0x1.95c28e0000000p-6f, 0x1.acccce0000000p-6f, 0x1.c3d70e0000000p-6f,
    0x1.dae1460000000p-6f, 0x1.f1eb860000000p-6f, 0x1.047ae00000000p-5f, 0x1.1000000000000p-5f,
    0x1.1b851e0000000p-5f, 0x1.270a3e0000000p-5f, 0x1.328f5e0000000p-5f, 0x1.3e147a0000000p-5f,
    0x1.49999a0000000p-5f, 0x1.551eb80000000p-5f, 0x1.60a3d60000000p-5f, 0x1.6c28f60000000p-5f,
    0x1.77ae140000000p-5f, 0x1.8333340000000p-5f, 0x1.8eb8500000000p-5f, 0x1.9a3d700000000p-5f,
    0x1.a5c28e0000000p-5f, 0x1.b147ae0000000p-5f, 0x1.bcccce0000000p-5f, 0x1.c851ee0000000p-5f,
    0x1.d3d70e0000000p-5f, 0x1.df5c2a0000000p-5f, 0x1.eae1460000000p-5f, 0x1.f666660000000p-5f,
    0x1.00f5c40000000p-4f, 0x1.06b8540000000p-4f, 0x1.0c7ae20000000p-4f, 0x1.123d700000000p-4f,
    0x1.1800000000000p-4f, 0x1.1dc2900000000p-4f, 0x1.2385200000000p-4f, 0x1.2947ae0000000p-4f,
    0x1.2f0a3e0000000p-4f, 0x1.34ccce0000000p-4f, 0x1.3a8f5e0000000p-4f, 0x1.4051ec0000000p-4f,
    0x1.46147c0000000p-4f, 0x1.4bd70a0000000p-4f, 0x1.51999a0000000p-4f, 0x1.575c2a0000000p-4f,
    0x1.5d1eb80000000p-4f, 0x1.62e1480000000p-4f, 0x1.68a3d60000000p-4f, 0x1.6e66660000000p-4f,
    0x1.7428f60000000p-4f, 0x1.79eb860000000p-4f, 0x1.7fae160000000p-4f, 0x1.8570a40000000p-4f,
    0x1.8b33340000000p-4f, 0x1.90f5c40000000p-4f, 0x1.96b8520000000p-4f, 0x1.a800000000000p-4f,
    0x1.c4cccc0000000p-4f, 0x1.e1999a0000000p-4f, 0x1.fe66660000000p-4f, 0x1.0d99980000000p-3f,
    0x1.1c00000000000p-3f, 0x1.2a66680000000p-3f, 0x1.38cccc0000000p-3f, 0x1.4733340000000p-3f,
    0x1.5599980000000p-3f, 0x1.6400000000000p-3f, 0x1.7266680000000p-3f, 0x1.80cccc0000000p-3f,
    0x1.8f33340000000p-3f, 0x1.9d99980000000p-3f, 0x1.ac00000000000p-3f, 0x1.ba66680000000p-3f,
    0x1.c8cccc0000000p-3f, 0x1.d733340000000p-3f, 0x1.e599980000000p-3f, 0x1.f400000000000p-3f,
    0x1.0133320000000p-2f, 0x1.0866660000000p-2f, 0x1.0f999a0000000p-2f, 0x1.16cccc0000000p-2f,
    0x1.1e00000000000p-2f, 0x1.2533340000000p-2f, 0x1.2c66660000000p-2f, 0x1.3399980000000p-2f,
    0x1.3acccc0000000p-2f, 0x1.4200000000000p-2f, 0x1.4933340000000p-2f, 0x1.5066660000000p-2f,
    0x1.5799980000000p-2f, 0x1.5ecccc0000000p-2f, 0x1.6600000000000p-2f, 0x1.6d33340000000p-2f,
    0x1.7466660000000p-2f, 0x1.7b99980000000p-2f, 0x1.82cccc0000000p-2f, 0x1.8a00000000000p-2f,
    0x1.9133340000000p-2f, 0x1.9866660000000p-2f, 0x1.9f99980000000p-2f, 0x1.a6cccc0000000p-2f,
    0x1.ae00000000000p-2f, 0x1.b533340000000p-2f, 0x1.bc66660000000p-2f, 0x1.c399980000000p-2f,
    0x1.cacccc0000000p-2f, 0x1.d200000000000p-2f, 0x1.d933340000000p-2f, 0x1.e066660000000p-2f,
    0x1.e799980000000p-2f, 0x1.eecccc0000000p-2f, 0x1.f600000000000p-2f, 0x1.fd33320000000p-2f,
    0x1.0233340000000p-1f, 0x1.05cccc0000000p-1f, 0x1.0966660000000p-1f, 0x1.0d00000000000p-1f,
    0x1.1099980000000p-1f, 0x1.1433340000000p-1f, 0x1.17cccc0000000p-1f, 0x1.1b66680000000p-1f,
    0x1.1f00000000000p-1f, 0x1.22999a0000000p-1f, 0x1.2633340000000p-1f, 0x1.29cccc0000000p-1f,
    0x1.2d66680000000p-1f, 0x1.3100000000000p-1f, 0x1.34999a0000000p-1f, 0x1.3833340000000p-1f,
    0x1.3bcccc0000000p-1f, 0x1.3f66680000000p-1f, 0x1.4300000000000p-1f, 0x1.46999a0000000p-1f,
    0x1.4a33340000000p-1f, 0x1.4dcccc0000000p-1f, 0x1.5166680000000p-1f, 0x1.5500000000000p-1f,
    0x1.58999a0000000p-1f, 0x1.5c33340000000p-1f, 0x1.5fcccc0000000p-1f, 0x1.6366680000000p-1f,
    0x1.6700000000000p-1f, 0x1.6a999a0000000p-1f, 0x1.6e33340000000p-1f, 0x1.71cccc0000000p-1f,
    0x1.7566680000000p-1f, 0x1.7900000000000p-1f, 0x1.7c999a0000000p-1f, 0x1.8033340000000p-1f,
    0x1.83cccc0000000p-1f, 0x1.8766680000000p-1f, 0x1.8b00000000000p-1f, 0x1.8e99980000000p-1f,
    0x1.9233340000000p-1f, 0x1.95cccc0000000p-1f, 0x1.9966680000000p-1f, 0x1.9d00000000000p-1f,
    0x1.a099980000000p-1f, 0x1.a433340000000p-1f, 0x1.a7cccc0000000p-1f, 0x1.ab66680000000p-1f,
    0x1.af00000000000p-1f, 0x1.b299980000000p-1f, 0x1.b633340000000p-1f, 0x1.b9cccc0000000p-1f,
    0x1.bd66680000000p-1f, 0x1.c100000000000p-1f, 0x1.c499980000000p-1f, 0x1.c833340000000p-1f,
    0x1.cbcccc0000000p-1f, 0x1.cf66680000000p-1f, 0x1.d300000000000p-1f, 0x1.d699980000000p-1f,
    0x1.da33340000000p-1f, 0x1.ddcccc0000000p-1f, 0x1.e166680000000p-1f, 0x1.e500000000000p-1f,
    0x1.e899980000000p-1f, 0x1.ec33340000000p-1f, 0x1.efcccc0000000p-1f, 0x1.f366680000000p-1f,
    0x1.f700000000000p-1f, 0x1.fa99980000000p-1f, 0x1.fe33340000000p-1f, 0x1p+0f,
};

void adamw8_dynamic_map(int is_signed, float map[256]) {
    memcpy(map, is_signed ? DYNAMIC_MAP_SIGNED : DYNAMIC_MAP_UNSIGNED, 256 * sizeof *map);
}

int64_t adamw8_state_bytes(const int64_t *seg_n, int n_seg, int64_t min_8bit_size) {
    int64_t b = 0;
    for (int i = 0; i < n_seg; i++)
        b += seg_n[i] >= min_8bit_size ? 2 * seg_n[i] + 2 * 4 * ((seg_n[i] + ADAMW8_BLOCK - 1) / ADAMW8_BLOCK)
                                       : 8 * seg_n[i];
    return b;
}

int adamw8_state_init(adamw8_state *s, const int64_t *seg_n, int n_seg, int64_t min_8bit_size, qerr *e) {
    memset(s, 0, sizeof *s);
    if (n_seg < 0) return qerr_set(e, "adamw8: %d segments", n_seg);
    s->seg = calloc((size_t)(n_seg ? n_seg : 1), sizeof *s->seg);
    if (!s->seg) return qerr_set(e, "out of memory (8-bit AdamW segments)");
    s->n_seg = n_seg;
    for (int i = 0; i < n_seg; i++) {
        if (seg_n[i] < 0) {
            adamw8_state_free(s);
            return qerr_set(e, "adamw8: segment %d has %lld elements", i, (long long)seg_n[i]);
        }
        adamw8_segment *g = &s->seg[i];
        g->off = s->n;
        g->n = seg_n[i];
        g->q8 = seg_n[i] >= min_8bit_size;
        if (g->q8) {
            g->block0 = s->n_blocks;
            s->n_blocks += (seg_n[i] + ADAMW8_BLOCK - 1) / ADAMW8_BLOCK;
        } else {
            g->small0 = s->n_small;
            s->n_small += seg_n[i];
        }
        s->n += seg_n[i];
    }
    s->q1 = calloc((size_t)(s->n ? s->n : 1), 1);
    s->q2 = calloc((size_t)(s->n ? s->n : 1), 1);
    s->absmax1 = calloc((size_t)(s->n_blocks ? s->n_blocks : 1), sizeof(float));
    s->absmax2 = calloc((size_t)(s->n_blocks ? s->n_blocks : 1), sizeof(float));
    s->m32 = calloc((size_t)(s->n_small ? s->n_small : 1), sizeof(float));
    s->v32 = calloc((size_t)(s->n_small ? s->n_small : 1), sizeof(float));
    if (!s->q1 || !s->q2 || !s->absmax1 || !s->absmax2 || !s->m32 || !s->v32) {
        adamw8_state_free(s);
        return qerr_set(e, "out of memory (8-bit AdamW states)");
    }
    adamw8_dynamic_map(1, s->map1);
    adamw8_dynamic_map(0, s->map2);
    adamw8_bounds(s->map1, s->bounds1);
    adamw8_bounds(s->map2, s->bounds2);
    return 0;
}

void adamw8_state_free(adamw8_state *s) {
    if (!s) return;
    free(s->seg);
    free(s->q1);
    free(s->q2);
    free(s->absmax1);
    free(s->absmax2);
    free(s->m32);
    free(s->v32);
    memset(s, 0, sizeof *s);
}

/* ------------------------------------------------------------------------ */
/* bitsandbytes' quantize_blockwise as its default kernel computes it (backends/default/ops.py; its CUDA
 * kernel also stores the nearest entry): x / absmax clamped to [-1, 1] (a whole block multiplies by the
 * fp32 reciprocal of its absmax, the last partial block of a tensor divides), then the number of map
 * midpoints below it (torch.bucketize): the nearest entry, a tie going to the lower one. An all-zero
 * block's absmax is 0 (1e-38 when it is a partial block, as the kernel stores it). The native CPU
 * kernel of bitsandbytes 0.50.2 differs near 0 (scripts/make_adamw8bit_fixture.py says how). */

void adamw8_bounds(const float map[256], float bounds[255]) {
    for (int i = 0; i < 255; i++) bounds[i] = (map[i] + map[i + 1]) / 2.0f;
}

uint8_t adamw8_quantize_one(const float bounds[255], float z) {
    int lo = 0, hi = 255; /* the number of bounds < z */
    while (lo < hi) {
        int mid = (lo + hi) / 2;
        if (bounds[mid] < z)
            lo = mid + 1;
        else
            hi = mid;
    }
    return (uint8_t)lo;
}

static float clamp1(float v) { return v < -1.0f ? -1.0f : v > 1.0f ? 1.0f : v; }

/* whole: a block of ADAMW8_BLOCK elements (else the tensor's partial last block) */
static void quantize_block(const float bounds[255], const float *x, int64_t n, int whole, uint8_t *q,
                           float *absmax) {
    float a = 0.0f;
    for (int64_t i = 0; i < n; i++) a = fmaxf(a, fabsf(x[i]));
    float ac = a < 1e-38f ? 1e-38f : a;
    *absmax = whole ? a : ac;
    if (whole) {
        float r = 1.0f / ac;
        for (int64_t i = 0; i < n; i++) q[i] = adamw8_quantize_one(bounds, clamp1(x[i] * r));
    } else {
        for (int64_t i = 0; i < n; i++) q[i] = adamw8_quantize_one(bounds, clamp1(x[i] / ac));
    }
}

void adamw8_step(adamw8_state *s, const adamw_config *c, double lr, float *param, const float *grad) {
    const int64_t t = ++s->step;
    const float b1 = (float)c->beta1, b2 = (float)c->beta2;
    const float omb1 = (float)(1.0 - c->beta1), omb2 = (float)(1.0 - c->beta2);
    const double bc1 = 1.0 - pow(c->beta1, (double)t), c2 = sqrt(1.0 - pow(c->beta2, (double)t));
    const int wd = c->weight_decay > 0.0;
    const float decay = (float)(1.0 - lr * c->weight_decay);
    const float eps = (float)c->eps;
    /* 8-bit: (float) of the Python scalars bnb passes to torch ops */
    const float c2f = (float)c2, step8 = (float)(-lr / bc1);
    /* 32-bit: step_size = -lr * correction2 / correction1, eps * correction2 */
    const float step32 = (float)(-lr * c2 / bc1), epsc2 = (float)(c->eps * c2);
    for (int si = 0; si < s->n_seg; si++) {
        const adamw8_segment *g = &s->seg[si];
        float *p = param + g->off;
        const float *gr = grad + g->off;
        if (!g->q8) {
            float *m = s->m32 + g->small0, *v = s->v32 + g->small0;
#pragma omp parallel for schedule(static)
            for (int64_t i = 0; i < g->n; i++) {
                float gi = gr[i];
                m[i] = m[i] * b1 + omb1 * gi;
                v[i] = v[i] * b2 + omb2 * gi * gi;
                float pi = p[i];
                if (wd) pi = pi * decay;
                float u = m[i] / (sqrtf(v[i]) + epsc2);
                p[i] = pi + step32 * u;
            }
            continue;
        }
        const int64_t nb = (g->n + ADAMW8_BLOCK - 1) / ADAMW8_BLOCK;
#pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < nb; b++) {
            const int64_t i0 = b * ADAMW8_BLOCK, len = g->n - i0 < ADAMW8_BLOCK ? g->n - i0 : ADAMW8_BLOCK;
            float m[ADAMW8_BLOCK], v[ADAMW8_BLOCK];
            uint8_t *q1 = s->q1 + g->off + i0, *q2 = s->q2 + g->off + i0;
            const float a1 = s->absmax1[g->block0 + b], a2 = s->absmax2[g->block0 + b];
            for (int64_t i = 0; i < len; i++) {
                float gi = gr[i0 + i];
                m[i] = (s->map1[q1[i]] * a1) * b1 + omb1 * gi;
                v[i] = (s->map2[q2[i]] * a2) * b2 + omb2 * gi * gi;
                float denom = sqrtf(v[i]) / c2f + eps;
                float pi = p[i0 + i];
                if (wd) pi = pi * decay;
                p[i0 + i] = pi + step8 * (m[i] / denom);
            }
            quantize_block(s->bounds1, m, len, len == ADAMW8_BLOCK, q1, &s->absmax1[g->block0 + b]);
            quantize_block(s->bounds2, v, len, len == ADAMW8_BLOCK, q2, &s->absmax2[g->block0 + b]);
        }
    }
}

void adamw8_dequantize(const adamw8_state *s, float *m, float *v) {
    for (int si = 0; si < s->n_seg; si++) {
        const adamw8_segment *g = &s->seg[si];
        for (int64_t i = 0; i < g->n; i++) {
            if (g->q8) {
                int64_t b = g->block0 + i / ADAMW8_BLOCK;
                m[g->off + i] = s->map1[s->q1[g->off + i]] * s->absmax1[b];
                v[g->off + i] = s->map2[s->q2[g->off + i]] * s->absmax2[b];
            } else {
                m[g->off + i] = s->m32[g->small0 + i];
                v[g->off + i] = s->v32[g->small0 + i];
            }
        }
    }
}
