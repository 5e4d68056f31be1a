-- Differential corpus for reads across shards (tests/e2e/test_crossshard_corpus.py).
-- One query per line. Markers in a trailing comment: "-- multiset" (the order is not total),
-- "-- float4" (real sums: looser float tolerance), "-- expect 0A000" (pgshard must refuse it).
-- Tables: customers (sharded by id), orders (sharded by customer_id), countries (omnisharded).

-- ORDER BY + LIMIT / OFFSET (every order total)
SELECT id, customer_id, amount FROM orders ORDER BY id LIMIT 10
SELECT id, customer_id, amount FROM orders ORDER BY id DESC LIMIT 10
SELECT id, amount FROM orders ORDER BY amount, id LIMIT 25
SELECT id, amount FROM orders ORDER BY amount DESC, id LIMIT 25
SELECT id, amount FROM orders ORDER BY amount DESC NULLS LAST, id LIMIT 25
SELECT id, amount FROM orders ORDER BY amount ASC NULLS FIRST, id LIMIT 25
SELECT id, amount FROM orders ORDER BY amount NULLS FIRST, id DESC LIMIT 25 OFFSET 10
SELECT id, amount FROM orders ORDER BY 2 DESC, 1 LIMIT 7 OFFSET 3
SELECT id, price FROM orders ORDER BY price, id LIMIT 30
SELECT id, price FROM orders ORDER BY price DESC, id LIMIT 30
SELECT id, price FROM orders ORDER BY price DESC NULLS LAST, id LIMIT 30
SELECT id, weight FROM orders ORDER BY weight, id LIMIT 20 OFFSET 100
SELECT id, exact FROM orders ORDER BY exact DESC, id LIMIT 40
SELECT id, exact FROM orders ORDER BY exact, id OFFSET 5990
SELECT id, status FROM orders ORDER BY status, id LIMIT 50
SELECT id, status FROM orders ORDER BY status DESC, id LIMIT 50
SELECT id, status FROM orders ORDER BY status NULLS FIRST, id LIMIT 50 OFFSET 20
SELECT id, note FROM orders ORDER BY note, id LIMIT 60
SELECT id, code FROM orders ORDER BY code DESC, id DESC LIMIT 60
SELECT id, name FROM customers ORDER BY name, id LIMIT 40
SELECT id, name FROM customers ORDER BY name DESC NULLS LAST, id LIMIT 40
SELECT id, created_at FROM orders ORDER BY created_at, id LIMIT 20
SELECT id, created_at FROM orders ORDER BY created_at DESC, id LIMIT 20
SELECT id, local_at FROM orders ORDER BY local_at, id LIMIT 20
SELECT id, local_at FROM orders ORDER BY local_at DESC, id LIMIT 20
SELECT id, day FROM orders ORDER BY day, id LIMIT 20
SELECT id, day FROM orders ORDER BY day DESC NULLS LAST, id LIMIT 20
SELECT id, flag FROM orders ORDER BY flag, id LIMIT 20 OFFSET 2000
SELECT id, qty, amount FROM orders ORDER BY qty DESC, amount, id LIMIT 15
SELECT * FROM orders ORDER BY id LIMIT 5
SELECT * FROM orders ORDER BY amount DESC, id LIMIT 5 OFFSET 5
SELECT * FROM customers ORDER BY score DESC NULLS LAST, id LIMIT 12
SELECT * FROM customers ORDER BY 4, 1 LIMIT 12
SELECT id FROM orders ORDER BY amount, id LIMIT 10
SELECT id FROM orders ORDER BY lower(status), id LIMIT 30
SELECT id, status FROM orders ORDER BY upper(status) DESC, id LIMIT 30
SELECT id, qty * 2 AS double_qty FROM orders ORDER BY double_qty DESC, id LIMIT 10
SELECT id, qty + coalesce(bits, 0) AS s FROM orders ORDER BY qty + coalesce(bits, 0), id LIMIT 10
SELECT id, amount FROM orders WHERE amount > 500 ORDER BY amount, id LIMIT 10 OFFSET 10
SELECT id, amount FROM orders WHERE status = 'open' ORDER BY amount DESC, id LIMIT 10
SELECT id, amount FROM orders WHERE customer_id IN (1, 2, 3, 4, 5, 6, 7, 8) ORDER BY id LIMIT 20
SELECT id, customer_id FROM orders WHERE customer_id IN (10, 20, 30) ORDER BY customer_id, id
SELECT id, amount FROM orders ORDER BY id FETCH FIRST 4 ROWS ONLY
SELECT id, amount FROM orders ORDER BY id OFFSET 10 ROWS FETCH NEXT 4 ROWS ONLY
SELECT id, amount FROM orders ORDER BY id LIMIT ALL OFFSET 5995
SELECT id, amount FROM orders ORDER BY id LIMIT 0
SELECT id, amount FROM orders ORDER BY id LIMIT NULL OFFSET 5990
SELECT id, amount FROM orders ORDER BY id LIMIT 2 + 3 OFFSET 1 + 1
SELECT o.id, o.amount, c.name FROM orders o JOIN customers c ON c.id = o.customer_id ORDER BY o.id LIMIT 20
SELECT o.id, c.name FROM orders o JOIN customers c ON c.id = o.customer_id ORDER BY c.name, o.id LIMIT 20
SELECT o.id, c.region FROM orders o LEFT JOIN customers c ON c.id = o.customer_id ORDER BY c.region NULLS FIRST, o.id LIMIT 20
SELECT id, amount, (SELECT name FROM customers c WHERE c.id = o.customer_id) AS who FROM orders o ORDER BY id LIMIT 10
SELECT id, now() IS NOT NULL AS ok FROM orders ORDER BY id LIMIT 3
SELECT id, amount::text AS t FROM orders ORDER BY t, id LIMIT 20
SELECT id, created_at::date AS d FROM orders ORDER BY d DESC, id LIMIT 20
SELECT id, round(price::numeric, 1) AS p FROM orders WHERE price <> 'NaN' ORDER BY p, id LIMIT 20
SELECT c.code, c.name FROM countries c ORDER BY c.code

-- ORDER BY without LIMIT: a streaming merge
SELECT id, amount FROM orders ORDER BY id
SELECT id, amount FROM orders ORDER BY amount DESC NULLS LAST, id
SELECT id, status FROM orders ORDER BY status, id
SELECT id, name FROM customers ORDER BY name, id
SELECT id, created_at FROM orders ORDER BY created_at, id
SELECT id, day FROM orders ORDER BY day, id
SELECT id, price FROM orders ORDER BY price, id
SELECT id, exact FROM orders ORDER BY exact NULLS FIRST, id
SELECT id, customer_id FROM orders WHERE qty = 7 ORDER BY customer_id DESC, id DESC
SELECT id, score FROM customers ORDER BY score, id
SELECT id FROM orders WHERE customer_id BETWEEN 100 AND 110 ORDER BY customer_id, id
SELECT id, status FROM orders ORDER BY status -- multiset

-- aggregates without GROUP BY
SELECT count(*) FROM orders
SELECT count(*) FROM customers
SELECT count(*) AS n FROM orders WHERE amount > 100
SELECT count(amount), count(price), count(status), count(DISTINCT status) FROM orders
SELECT sum(qty), sum(amount), sum(exact) FROM orders
SELECT sum(price) FROM orders WHERE price <> 'NaN'
SELECT sum(price) FROM orders
SELECT sum(weight) FROM orders -- float4
SELECT min(amount), max(amount), min(exact), max(exact) FROM orders
SELECT min(price), max(price) FROM orders
SELECT min(status), max(status), min(note), max(note) FROM orders
SELECT min(code), max(code) FROM orders
SELECT min(created_at), max(created_at), min(local_at), max(local_at), min(day), max(day) FROM orders
SELECT avg(qty) FROM orders
SELECT avg(amount) FROM orders
SELECT avg(exact) FROM orders
SELECT avg(customer_id) FROM orders
SELECT avg(price) FROM orders WHERE price <> 'NaN'
SELECT avg(weight) FROM orders -- float4
SELECT avg(qty), avg(amount), sum(qty), count(*) FROM orders WHERE status IS NULL
SELECT avg(created_at - '2019-01-01') FROM orders
SELECT bool_and(flag), bool_or(flag), every(flag) FROM orders
SELECT bool_and(flag) FROM orders WHERE qty > 49
SELECT bit_and(bits), bit_or(bits), bit_xor(bits) FROM orders
SELECT count(*), sum(qty), avg(qty), min(qty), max(qty) FROM orders WHERE qty > 1000
SELECT sum(amount) / count(*) AS per_order FROM orders
SELECT sum(qty) / count(qty) FROM orders
SELECT round(avg(amount), 2) AS a, round(avg(exact), 3) AS e FROM orders
SELECT avg(qty) * 2 AS twice, avg(qty) + 1 FROM orders
SELECT count(*) FILTER (WHERE flag) AS yes, count(*) FILTER (WHERE NOT flag) AS no FROM orders
SELECT sum(amount) FILTER (WHERE status = 'open'), avg(qty) FILTER (WHERE qty > 10) FROM orders
SELECT CASE WHEN count(*) > 1000 THEN 'many' ELSE 'few' END AS size FROM orders
SELECT count(*) + 1 AS n1, max(qty) - min(qty) AS spread FROM orders
SELECT count(*), now() IS NOT NULL FROM orders
SELECT count(DISTINCT customer_id) FROM orders
SELECT count(DISTINCT status), count(*) FROM orders
SELECT count(DISTINCT qty), sum(DISTINCT qty), avg(DISTINCT qty), min(qty), max(qty) FROM orders
SELECT count(DISTINCT region) FROM customers
SELECT count(*) FROM orders o JOIN customers c ON c.id = o.customer_id WHERE c.vip
SELECT sum(o.amount), avg(c.score) FROM orders o JOIN customers c ON c.id = o.customer_id
SELECT count(*) FROM orders WHERE customer_id IN (1, 2, 3, 4, 5, 6, 7, 8, 9)
SELECT count(*) FROM orders WHERE customer_id IN (SELECT id FROM customers WHERE id = orders.customer_id AND vip)
SELECT count(*) FROM countries
SELECT max(amount) FROM orders HAVING count(*) > 10
SELECT max(amount) FROM orders HAVING count(*) > 100000

-- GROUP BY
SELECT status, count(*) FROM orders GROUP BY status ORDER BY status
SELECT status, count(*) FROM orders GROUP BY status -- multiset
SELECT status, count(*) AS n FROM orders GROUP BY status ORDER BY n DESC, status
SELECT status, count(*) FROM orders GROUP BY 1 ORDER BY 2 DESC, 1
SELECT status, count(*) FROM orders GROUP BY status ORDER BY count(*), status NULLS FIRST
SELECT status, count(*) FROM orders GROUP BY status ORDER BY count DESC, status
SELECT status, sum(amount), avg(amount), min(amount), max(amount) FROM orders GROUP BY status ORDER BY status
SELECT status, avg(price) FROM orders WHERE price <> 'NaN' GROUP BY status ORDER BY status
SELECT status, avg(weight) FROM orders GROUP BY status ORDER BY status -- float4
SELECT lower(status) AS s, count(*) FROM orders GROUP BY lower(status) ORDER BY s
SELECT lower(status), count(*) FROM orders GROUP BY 1 ORDER BY 1
SELECT upper(status) AS u, sum(qty) FROM orders GROUP BY u ORDER BY u NULLS FIRST
SELECT qty, count(*) FROM orders GROUP BY qty ORDER BY qty NULLS FIRST
SELECT qty % 5 AS bucket, count(*), sum(amount) FROM orders GROUP BY qty % 5 ORDER BY bucket
SELECT flag, count(*) FROM orders GROUP BY flag ORDER BY flag
SELECT code, count(*), min(id) FROM orders GROUP BY code ORDER BY code
SELECT date_trunc('month', created_at) AS m, count(*) FROM orders GROUP BY 1 ORDER BY 1
SELECT date_trunc('year', created_at) AS y, sum(amount), avg(qty) FROM orders GROUP BY y ORDER BY y DESC
SELECT extract(year FROM day) AS y, count(*) FROM orders GROUP BY 1 ORDER BY 1
SELECT day, count(*) FROM orders GROUP BY day ORDER BY count(*) DESC, day LIMIT 10
SELECT customer_id, count(*), sum(amount) FROM orders GROUP BY customer_id ORDER BY customer_id
SELECT customer_id, count(*) FROM orders GROUP BY customer_id ORDER BY count(*) DESC, customer_id LIMIT 10
SELECT customer_id, sum(amount) AS total FROM orders GROUP BY customer_id ORDER BY total DESC NULLS LAST, customer_id LIMIT 15 OFFSET 5
SELECT customer_id, max(created_at) FROM orders GROUP BY customer_id HAVING count(*) > 12 ORDER BY customer_id
SELECT status, count(*) FROM orders GROUP BY status HAVING count(*) > 500 ORDER BY status
SELECT status, count(*) FROM orders GROUP BY status HAVING sum(qty) > 10000 AND max(amount) > 0 ORDER BY 1
SELECT status, avg(qty) FROM orders GROUP BY status HAVING avg(qty) > 25 ORDER BY avg(qty), status
SELECT status FROM orders GROUP BY status HAVING count(*) > 10 ORDER BY status
SELECT status, flag, count(*), sum(qty) FROM orders GROUP BY status, flag ORDER BY status, flag
SELECT status, flag, count(*) FROM orders GROUP BY flag, status ORDER BY 3 DESC, 1, 2
SELECT status, count(DISTINCT customer_id) FROM orders GROUP BY status ORDER BY status
SELECT status, count(DISTINCT qty), count(*), sum(amount) FROM orders GROUP BY status ORDER BY status
SELECT flag, sum(DISTINCT qty), avg(DISTINCT qty) FROM orders GROUP BY flag ORDER BY flag
SELECT status, count(*) FILTER (WHERE flag), avg(amount) FILTER (WHERE qty > 5) FROM orders GROUP BY status ORDER BY status
SELECT status, sum(qty) / count(*) AS ratio FROM orders GROUP BY status ORDER BY ratio, status
SELECT status, round(avg(amount), 1) FROM orders GROUP BY status ORDER BY 2 DESC NULLS LAST, 1
SELECT status, CASE WHEN count(*) > 500 THEN 'big' ELSE 'small' END FROM orders GROUP BY status ORDER BY 1
SELECT status, bool_and(flag), bool_or(flag), bit_or(bits) FROM orders GROUP BY status ORDER BY status
SELECT status, min(note), max(note) FROM orders GROUP BY status ORDER BY status
SELECT c.region, count(*), sum(o.amount) FROM orders o JOIN customers c ON c.id = o.customer_id GROUP BY c.region ORDER BY c.region
SELECT c.vip, avg(o.qty) FROM orders o JOIN customers c ON c.id = o.customer_id GROUP BY c.vip ORDER BY 1
SELECT region, count(*), avg(score) FROM customers GROUP BY region ORDER BY region
SELECT region, max(name), min(name) FROM customers GROUP BY region ORDER BY region
SELECT id, count(*) FROM customers GROUP BY id ORDER BY id LIMIT 5
SELECT name, count(*) FROM customers GROUP BY name ORDER BY count(*) DESC, name LIMIT 10
SELECT status, qty FROM orders GROUP BY status, qty ORDER BY status, qty LIMIT 40
SELECT DISTINCT count(*) FROM orders GROUP BY status -- multiset
SELECT count(*) FROM orders GROUP BY status -- multiset
SELECT status, count(*) FROM orders WHERE qty > 100 GROUP BY status
SELECT status, count(*) FROM orders GROUP BY status ORDER BY status LIMIT 3 OFFSET 2
SELECT status, count(*) FROM orders GROUP BY status ORDER BY status FETCH FIRST 2 ROWS ONLY

-- DISTINCT
SELECT DISTINCT status FROM orders ORDER BY status
SELECT DISTINCT status FROM orders -- multiset
SELECT DISTINCT status, flag FROM orders ORDER BY status, flag
SELECT DISTINCT qty FROM orders ORDER BY qty DESC NULLS LAST LIMIT 5
SELECT DISTINCT region FROM customers ORDER BY region NULLS FIRST
SELECT DISTINCT lower(status) FROM orders ORDER BY 1
SELECT DISTINCT code FROM orders ORDER BY code
SELECT DISTINCT ON (status) status, id, amount FROM orders ORDER BY status, amount DESC NULLS LAST, id
SELECT DISTINCT ON (customer_id) customer_id, id FROM orders ORDER BY customer_id, id LIMIT 20
SELECT DISTINCT ON (flag) flag, qty FROM orders ORDER BY flag, qty DESC NULLS LAST
SELECT DISTINCT amount FROM orders WHERE amount < 0 ORDER BY amount
SELECT DISTINCT exact FROM orders WHERE exact BETWEEN 1 AND 2 ORDER BY exact

-- UNION / UNION ALL: each part routes on its own; parts of sharded rows run together and merge
SELECT code FROM orders UNION SELECT code FROM countries ORDER BY 1
SELECT status FROM orders UNION SELECT name FROM countries ORDER BY 1 DESC NULLS LAST LIMIT 5
SELECT status FROM orders UNION SELECT name FROM countries -- multiset
SELECT id, amount FROM orders WHERE customer_id = 5 UNION ALL SELECT id, amount FROM orders WHERE customer_id = 7 -- multiset
SELECT id, amount FROM orders WHERE customer_id = 5 UNION ALL SELECT id, amount FROM orders WHERE customer_id = 5 -- multiset
SELECT id FROM orders WHERE customer_id = 5 UNION ALL SELECT id FROM orders WHERE customer_id = 7 ORDER BY id DESC LIMIT 4
SELECT id, customer_id FROM orders WHERE customer_id IN (1, 2) UNION ALL SELECT id, id FROM customers WHERE id = 3 ORDER BY 1, 2
SELECT id, status FROM orders WHERE qty = 1 UNION ALL SELECT id, name FROM customers WHERE score > 990 -- multiset
SELECT status FROM orders WHERE qty < 3 UNION ALL SELECT name FROM customers WHERE vip ORDER BY 1 NULLS FIRST LIMIT 30
SELECT qty FROM orders UNION SELECT score FROM customers ORDER BY 1 NULLS FIRST
SELECT customer_id FROM orders WHERE customer_id = 9 UNION SELECT id FROM customers WHERE id = 10 -- multiset
SELECT id, amount FROM orders UNION ALL SELECT id, score FROM customers -- multiset
SELECT code FROM countries UNION ALL SELECT status FROM orders WHERE customer_id = 4 -- multiset
SELECT count(*) FROM (SELECT id FROM orders WHERE customer_id = 3 UNION ALL SELECT id FROM orders WHERE customer_id = 3) s
(SELECT id FROM orders WHERE customer_id = 5 ORDER BY id LIMIT 2) UNION ALL (SELECT id FROM orders WHERE customer_id = 8 ORDER BY id DESC LIMIT 2) -- multiset
SELECT customer_id, count(*) FROM orders WHERE customer_id IN (5, 8) GROUP BY customer_id UNION ALL SELECT id, score FROM customers WHERE id = 8 -- multiset
SELECT status FROM orders WHERE qty < 3 UNION ALL SELECT code FROM countries ORDER BY 1 -- expect 0A000
SELECT id::text FROM orders WHERE qty = 1 UNION ALL SELECT code FROM countries ORDER BY 1 LIMIT 20 OFFSET 3 -- expect 0A000
SELECT status FROM orders UNION ALL SELECT name FROM countries LIMIT 3 -- expect 0A000
SELECT id FROM orders UNION ALL SELECT id FROM customers WHERE EXISTS (SELECT 1 FROM orders WHERE qty = 3) -- expect 0A000
SELECT count(*) FROM orders UNION ALL SELECT count(*) FROM customers -- expect 0A000

-- a user-defined aggregate (CREATE AGGREGATE through pgshard): one shard, or refused
SELECT corpus_sum(qty), count(*) FROM orders WHERE customer_id = 17
SELECT corpus_sum(qty) FROM orders -- expect 0A000
SELECT status, corpus_sum(qty) FROM orders GROUP BY status ORDER BY status -- expect 0A000
SELECT id, (SELECT corpus_sum(qty) FROM orders i WHERE i.customer_id = c.id) FROM customers c ORDER BY id LIMIT 20

-- rows that do not each come from a sharded row would repeat or go missing over several shards
SELECT c.code FROM countries c LEFT JOIN orders o ON o.code = c.code -- expect 0A000
SELECT count(*) FROM countries WHERE code IN (SELECT status FROM orders) -- expect 0A000
SELECT 1 AS one WHERE EXISTS (SELECT 1 FROM orders WHERE qty = 3) -- expect 0A000
SELECT c.code, count(o.id) FROM countries c LEFT JOIN orders o ON o.customer_id = 5 AND o.status = c.code GROUP BY c.code ORDER BY 1

-- more shapes: derived tables, CTEs, EXISTS on the key, constants, quoted aliases, NULL-only results
SELECT count(*) FROM orders WHERE false
SELECT count(*), sum(qty), max(day) FROM orders WHERE qty > 1000
SELECT count(*) AS "Count", sum(qty) AS "Sum Qty" FROM orders
SELECT 'const' AS c, count(*) FROM orders
SELECT count(*) > 0 AS any_rows FROM orders
SELECT max(created_at) - min(created_at) AS span FROM orders
SELECT avg(exact)::numeric(20,4) AS a FROM orders
SELECT sum(price) / sum(qty) FROM orders WHERE price <> 'NaN'
SELECT bool_or(vip), count(*) FILTER (WHERE vip IS NULL) FROM customers
SELECT count(*) FILTER (WHERE status ILIKE 'o%') FROM orders
SELECT min(id), max(id) FROM orders WHERE customer_id IN (3, 4)
SELECT count(*) FROM orders, countries WHERE countries.code = 'eu'
SELECT count(*) FROM orders o WHERE EXISTS (SELECT 1 FROM customers c WHERE c.id = o.customer_id AND c.vip)
WITH big AS (SELECT * FROM orders WHERE amount > 900) SELECT count(*), avg(amount) FROM big
WITH big AS (SELECT * FROM orders WHERE amount > 900) SELECT id FROM big ORDER BY amount DESC, id LIMIT 5
SELECT * FROM (SELECT id, amount FROM orders) s ORDER BY amount DESC, id LIMIT 5
SELECT s.k, count(*) FROM (SELECT customer_id % 7 AS k FROM orders) s GROUP BY s.k ORDER BY s.k
SELECT customer_id % 7 AS k, count(*) FROM orders GROUP BY k ORDER BY k
SELECT status, count(*) FROM orders GROUP BY status ORDER BY max(amount) DESC NULLS LAST, status LIMIT 3
SELECT qty, count(*) FROM orders GROUP BY qty HAVING qty > 40 ORDER BY qty
SELECT status, sum(exact) FROM orders GROUP BY status ORDER BY 2 NULLS FIRST, 1
SELECT upper(name), count(*) FROM customers GROUP BY upper(name) ORDER BY 2 DESC, 1 LIMIT 5
SELECT DISTINCT flag FROM orders ORDER BY flag NULLS FIRST
SELECT DISTINCT customer_id % 3 AS m FROM orders ORDER BY m
SELECT DISTINCT ON (customer_id) customer_id, amount FROM orders ORDER BY customer_id, amount DESC NULLS LAST, id LIMIT 10 OFFSET 5
SELECT id FROM orders ORDER BY id DESC LIMIT 5 OFFSET 0
SELECT id, amount FROM orders WHERE amount IS NULL ORDER BY id
SELECT id, status FROM orders ORDER BY status COLLATE "C" DESC, id LIMIT 10
SELECT id, day FROM orders ORDER BY day NULLS FIRST, id LIMIT 5
SELECT id, local_at FROM orders ORDER BY local_at NULLS FIRST, id LIMIT 5
SELECT id FROM orders ORDER BY random() LIMIT 0
SELECT id FROM orders ORDER BY id LIMIT -1
SELECT id FROM orders ORDER BY id OFFSET -1
SELECT DISTINCT status FROM orders ORDER BY id

-- keys pgshard cannot compare itself: the final query over the partial rows sorts (ICU collation, interval)
SELECT id, name FROM customers ORDER BY name COLLATE "und-x-icu", id LIMIT 30
SELECT id, name FROM customers ORDER BY name COLLATE "und-x-icu" DESC, id
SELECT id, name COLLATE "en-x-icu" AS n FROM customers ORDER BY n, id DESC LIMIT 50 OFFSET 10
SELECT min(name COLLATE "und-x-icu"), max(name COLLATE "und-x-icu") FROM customers
SELECT name COLLATE "und-x-icu" AS n, count(*) FROM customers GROUP BY 1 ORDER BY 1 LIMIT 20
SELECT DISTINCT status COLLATE "und-x-icu" AS s FROM orders ORDER BY s
SELECT id, created_at - '2019-01-01' AS age FROM orders ORDER BY age, id LIMIT 10
SELECT id, created_at - '2019-01-01' AS age FROM orders WHERE qty = 3 ORDER BY age DESC NULLS LAST, id
SELECT id, amount FROM orders ORDER BY amount::text COLLATE "C", id LIMIT 10
SELECT id, (id, qty) AS pair FROM orders ORDER BY id LIMIT 3

-- errors: the server's own SQLSTATE, as one server would answer
SELECT 1 / 0 FROM orders ORDER BY id LIMIT 1
SELECT nosuchcolumn FROM orders ORDER BY 1
SELECT status, count(*) FROM orders GROUP BY status HAVING count(*) / 0 > 1
SELECT id FROM orders ORDER BY 1 / (qty - qty), id LIMIT 1
SELECT sum(qty) FROM nosuchtable
SELECT status, qty, count(*) FROM orders GROUP BY status ORDER BY 1
SELECT id, sum(qty) FROM orders
SELECT count(*) FROM orders GROUP BY 7

-- refused: no exact answer from partial results (yet)
SELECT id, rank() OVER (ORDER BY amount) FROM orders ORDER BY id LIMIT 5 -- expect 0A000
SELECT id, sum(amount) OVER () FROM orders -- expect 0A000
SELECT status, row_number() OVER (PARTITION BY status ORDER BY id) FROM orders -- expect 0A000
SELECT string_agg(status, ',') FROM orders WHERE qty = 1 -- expect 0A000
SELECT array_agg(id) FROM orders WHERE qty = 1 -- expect 0A000
SELECT stddev(qty) FROM orders -- expect 0A000
SELECT variance(amount) FROM orders -- expect 0A000
SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY amount) FROM orders -- expect 0A000
SELECT mode() WITHIN GROUP (ORDER BY status) FROM orders -- expect 0A000
SELECT json_agg(id) FROM orders WHERE qty = 1 -- expect 0A000
SELECT status, count(*) FROM orders GROUP BY ROLLUP (status) -- expect 0A000
SELECT status, flag, count(*) FROM orders GROUP BY GROUPING SETS ((status), (flag)) -- expect 0A000
SELECT count(DISTINCT status), count(DISTINCT flag) FROM orders -- expect 0A000
SELECT id FROM orders ORDER BY qty FETCH FIRST 3 ROWS WITH TIES -- expect 0A000
SELECT id FROM orders WHERE qty = 1 INTERSECT SELECT id FROM customers -- expect 0A000
SELECT id FROM orders WHERE qty = 1 EXCEPT SELECT id FROM customers ORDER BY 1 -- expect 0A000
SELECT status, (SELECT count(*) FROM customers) FROM orders GROUP BY status -- expect 0A000
SELECT status, count(*) FROM orders GROUP BY CUBE (status) -- expect 0A000
SELECT status, count(*) OVER () FROM orders GROUP BY status -- expect 0A000
SELECT every(flag) FROM orders
SELECT status, every(flag) FROM orders GROUP BY status ORDER BY status
